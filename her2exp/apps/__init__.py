"""One module per command's work: what `her2exp-<command>` does once its arguments are checked.

One module per command, e.g. `export`, `predict` (with `predict_bags` for MIL runs), `prepare`,
`tile`, `rerun`, `compare`, `server`. The command line (`cli/`) parses, calls one
app, prints and sets the exit code; an app returns results and raises `ConfigError`/`UserError`.
May import every floor below: `training`, `evaluation`, `engine`, `data`, `tracking`,
`runtime`, `models`, `reports`, the pure floors, `config` and `core`; never `cli` or `bench`.
"""
