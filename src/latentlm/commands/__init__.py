"""One module per ``latentlm`` command, named like it (``sample-many`` -> ``sample_many``).

Each has ``run(cfg) -> exit code``; ``latentlm.cli`` imports a command module only when that command
runs. Nothing outside this package and ``cli.py`` imports a command module.
"""
