"""Task loops: each module has run(cfg, ctx) -> metrics and owns nothing but its loop."""
