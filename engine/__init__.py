"""Training and evaluation: what wires the config, the data and the models together (the trainer,
checkpoints and the rule that keeps them, evaluation, the run plan). The scripts sit on top."""
