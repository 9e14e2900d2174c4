"""The PostgreSQL backend of the Store: many runs in one database, many workers on each run.

:mod:`.connect` (the ``--state`` URL, a run's identity, errors without the password),
:mod:`.schema` (the shared schema and each run's, their migrations).
"""
