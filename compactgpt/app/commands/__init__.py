"""One module per group of verbs. For each verb V a module defines add_V_args(parser) and
run_V(args); compactgpt.app.cli lists which module holds which verb."""
