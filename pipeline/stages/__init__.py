"""Pipeline stages, one module each, each with one public `run(cfg, ctx)`."""
