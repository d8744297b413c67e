"""Tools on top of the library: the `dfkd` CLI, benchmarks, method comparison, the local fleet, prediction.
The library (config, core, stages, defs, registry model) never imports them."""
