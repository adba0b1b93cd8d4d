"""``python -m mapo_fast.trainer ...`` is ``mapo-train ...`` (handy under ``torchrun``)."""

from ..cli import train_main

train_main()
