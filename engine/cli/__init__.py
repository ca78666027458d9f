"""The command line (`python run.py VERB`): the verbs, the daemon (`serve`, `web`), the demo, preview,
member pages, funnels and the virtual clock of `simulate`.

May import: anything in the engine; nothing imports it but run.py.
"""
