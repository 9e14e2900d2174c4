"""The benchmark suite: ``python -m bench [FIGURE ...] [--quick] [--repeat N]`` (``make bench``).

Each figure runs the real command line, ``python -m runner run``, as a child process against the
built-in emulator, itself started as another child (``python -m runner emulate --port 0``), so
the runner's time, CPU and memory are its own and the two share the machine as a client and a
remote API would not: on a 2-core machine each gets about one core. Throughput figures are
timed over the run's request phase, from the first request the emulator received to the last it
answered (its request records carry ``received_at`` and ``answered_at``), so interpreter
start-up and the final ledger do not count; peak memory is the child's ``ru_maxrss`` from
``os.wait4``. Every figure prints its runs as it goes; ``__main__`` ends with one table of
figure, measured value (the median of the repeats), target and verdict.

Modules, one subject each:

* :mod:`bench.__main__`: the command line, the order of the figures, the final table;
* :mod:`bench.figures`: what a figure returns (:class:`~bench.figures.Row`), medians, options;
* :mod:`bench.procs`: child processes: the emulator (and its request records), the runner, the
  bare client, each timed and measured;
* :mod:`bench.manifests`: big CSV and YAML manifests, written as a stream;
* :mod:`bench.bare`: the bare aiohttp loop the overhead figure compares the runner with;
* one module per figure: :mod:`bench.overhead`, :mod:`bench.latency`, :mod:`bench.rate_limit`,
  :mod:`bench.memory`, :mod:`bench.scale`, :mod:`bench.report` (which also opens the report's
  page in Chromium, with the tests' DevTools driver).
"""
