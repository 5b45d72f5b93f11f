"""torch.cuda.device_count() as this Python's torch sees it (CUDA_VISIBLE_DEVICES honoured), on one line.

Run by the train stage with `.venv-gpu`'s own Python (`python -m training_pt.device_count`, isolated, by
tasks/proc.py's launcher) when no cuda_check record of the run says how many GPUs there are.
"""

from __future__ import annotations

import torch

from training_pt import quick_exit

if __name__ == "__main__":
    print(torch.cuda.device_count())
    quick_exit.exit_quickly(0)
