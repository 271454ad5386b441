"""A command run as a user runs it, in a process of its own, with a stop planted at a chosen moment."""


def at_call(script, where, n, then, imports=()):
    """Python code (for `python -c`, the command's arguments after it) that runs `script` as __main__, where
    the n-th call of `where` (module.attribute) first runs the statement `then` (os, signal and `imports`
    imported): a signal, an error, at the moment a test needs."""
    return (f"import os, runpy, signal, sys, {', '.join([*imports, where.split('.')[0]])}\n"
            f"f, calls = {where}, []\n"
            "def at_n(*a, **kw):\n"
            "    calls.append(1)\n"
            f"    if len(calls) == {n}:\n"
            f"        {then}\n"
            "    return f(*a, **kw)\n"
            f"{where} = at_n\n"
            f"sys.argv = [{script!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({script!r}, run_name='__main__')")
