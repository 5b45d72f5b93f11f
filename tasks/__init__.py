"""The logic behind the nox sessions of the M40 GPU bring-up tool.

Nothing in this package imports torch at module level: it runs in nox's own interpreter.
Code that needs torch runs inside `.venv-gpu` as a subprocess.
"""
