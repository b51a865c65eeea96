"""Training loops (SFT, OPD), evaluation, metrics and preemption handling."""
