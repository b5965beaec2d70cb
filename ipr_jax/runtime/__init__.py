"""The run machinery that training and evaluation share: errors, checkpoints and the train state,
devices and processes, signals, the environment record, the compilation cache."""
