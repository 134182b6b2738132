"""The machine line every benchmark prints, so figures are read with the hardware they came from."""

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line(device: torch.device) -> str:
    cuda = "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cuda = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    try:
        cpu_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        cpu_bf16 = False
    return (f"machine: cpu={cpu_model()}, cores={os.cpu_count()}, torch={torch.__version__}, "
            f"threads={torch.get_num_threads()}, device={device}, cuda={cuda}, cpu_bf16={'yes' if cpu_bf16 else 'no'}, "
            f"load={os.getloadavg()[0]:.2f}")
