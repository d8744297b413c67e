"""The method's stages, one function per stage, called by the Dagster assets (dfkd_assets/defs/)
and by `dfkd compare` alike, so experiments measure the code that ships (docs/ARCHITECTURE.md).

A stage takes the settings and loaded models, returns data, and writes nothing that another
asset reads: persisting is the asset's job (dfkd_assets/artifacts.py). No Dagster, MLflow or DVC
here; core/ holds the numerics the stages assemble.
"""
