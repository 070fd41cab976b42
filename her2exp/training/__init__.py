"""Training: the composition root of one run and the trainer with its components.

Owns `run` (`her2exp-train`'s work: build the parts, fit, evaluate, log), `builders` (each part
of a run built by one function: runtime, model, data, tracker, trainer), `trainer` (the epoch
loop) and its components `optimizer`, `checkpointer`, `validator` and `early_stopping`, `probe`
(the kNN fit step) and `final` (the final evaluation of a trained run). May import every floor
below: `evaluation`, `engine`, `data`, `tracking`, `runtime`, `models`, `reports`, the pure
floors, `config` and `core`; never `apps` or the command line, which call it.
"""
