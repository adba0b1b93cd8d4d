"""Compute kernels of mapo_fast, installed as ``mapo_fast.kernels``.

Each feature has a Triton module (kernels and their thin launchers; imported only where Triton is
available) and a plain-torch module with the same functions (``*_ref``), which is both the
reference the kernels are tested against and the CPU path.
"""
