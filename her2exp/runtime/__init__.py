"""Where and how a process runs: the process group and its collectives (`distributed`), the run
directory and what to resume from it (`rundir`), mixed precision (`amp`), stop signals
(`signals`) and what Hydra knows of the command line (`hydra_run`).

Every floor above needs these, and none of them needs a model, data or MLflow. May import
`core`, `config` and the pure floors (`metrics`, `stain`, `slides`), and its siblings `models`
and `reports` (no cycle; today it imports neither); never `tracking`, `data`, `engine` or
anything above.
"""
