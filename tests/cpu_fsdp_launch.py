"""`python tests/cpu_fsdp_launch.py ARGS...` = `python -m dgemma_ft.cli ARGS...`, except that accelerate honours an
FSDP config on CPU processes (gloo). Accelerate turns FSDP on only for accelerator devices and would silently
fall back to DDP here; FSDP2 itself runs on CPU, so this is enough to test the FSDP path without GPUs.
Used by tests/test_distributed.py through `accelerate launch --config_file recipes/accelerate/fsdp.yaml`."""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_original_init = AcceleratorState.__init__


def _init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_cpu_fsdp

if __name__ == "__main__":
    from dgemma_ft.cli import main

    sys.exit(main(sys.argv[1:]))
