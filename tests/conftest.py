"""Shared test settings: one torch thread per test (2-core CI machines; oversubscribed threads crawl), and
``gpu``-marked tests skipped with a reason where there is no CUDA device (``pytest`` alone is the full suite)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import Result


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- shared read-only artefacts (a test that must change one copies it to its tmp_path first) ---------------------

@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random-weight 2D x2 checkpoint (``enhance_fixtures.tiny_config()``); a space in its path on
    purpose (the CLI must cope with one)."""
    from enhance_fixtures import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny x2.pt", tiny_config())


@pytest.fixture(scope="session")
def ct_small_enhanced(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """``medsr enhance pydicom:CT_small.dcm`` with ``tiny_ckpt`` (2 samples, 2 steps, default format: NIfTI and
    DICOM): (the CLI result, the output folder). Read by the outputs and PACS tests; never write into it."""
    from enhance_fixtures import DICOM_REF
    from typer.testing import CliRunner

    import medsr.cli

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ct_small_enhanced")
    res = CliRunner().invoke(medsr.cli.app, ["enhance", DICOM_REF, "--model", str(tiny_ckpt), "--out", str(out),
                                             "--samples", "2", "--steps", "2", "--device", "cpu", "--amp", "none"])
    assert res.exit_code == 0, res.output
    return res, out / "CT_small"
