"""A ``medsr`` run that holds its second item until killed, for the kill -9 tests (local archive, DICOMweb).

The wrapper replaces ``process`` of the given pipeline module: the first item runs and is recorded; when the next
one is claimed, the wrapper writes its id to the marker file and sleeps, so the test kills at the same moment on
every machine (it waits for the marker, not for a clock). Run it as
``[sys.executable, "-c", HOLD_SECOND_ITEM, MODULE, MARKER, *medsr_args]`` from the repository root.
"""

HOLD_SECOND_ITEM = """
import importlib, sys, time
from pathlib import Path
from medsr.cli import app
pipeline, marker = importlib.import_module(sys.argv[1]), Path(sys.argv[2])
real, done = pipeline.process, []
def process(task):
    if done:  # one item is done and recorded, this one is claimed: say so, then hang until killed
        marker.write_text(task["id"])
        time.sleep(600)
    result = real(task)
    if result["state"] == "done":
        done.append(task["id"])
    return result
pipeline.process = process
sys.argv = ["medsr", *sys.argv[3:]]
app()
"""
