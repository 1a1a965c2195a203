"""Attacks on the detector: evasion at test time (``evasion``); poisoning during training comes later."""
