"""The code that runs in `.venv-gpu`'s Python and imports torch: the training smoke test (train.py, its
settings in configurator.py), the benchmark (bench.py), cuda_check's checker (gpu_checks.py) and
install's verifier (verify_torch.py).

Every module here is started by tasks/proc.py's one launcher as `python -m training_pt.<module>` (under
torchrun: `-m training_pt.train`) in an isolated environment: every PYTHON* variable scrubbed, PYTHONPATH
the repository root only, no user site-packages. It may import the torch-free helpers of `tasks`
(layout, config, cuda_rules, records); `tasks` imports nothing from here but configurator.py, which stays
torch-free (tests/test_boundary.py) so nox's side checks a training config with train.py's own rules.
"""
