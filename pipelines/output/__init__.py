"""The output: a run's rows written as Parquet part files, with the guarantees users rely on
(docs/reliability.md, "Reliability").

Its lifecycle, one step a module, the way Ray Data's ``Datasink`` names its own:

- prepare (``prepare``): before a run writes, ``check_output_mode`` and ``check_run_id_unused`` refuse
  what the output's state forbids; once the run holds the output's lock (``lock``), ``prepare_output``
  finishes swaps cut short, removes what interrupted runs left and returns the ids to skip;
- write (``writer``, ``parts``): the writer actor (``write_stream``) commits rows as part files as they
  come, each whole (``write_part_files``);
- commit (``commit``, ``audit``, ``retry``): a finished run's commit marker names its parts; an overwrite
  or a retry of error rows commits only once its audit passes, then swaps its staged parts in;
- interrupted (``interrupted``): a run that ended without its marker gets one from the run after it, and
  a swap cut short is finished.

Modules, lowest first, each importing only those before it: ``layout`` (names, listing, writing a file
whole), ``ids`` (row ids in bounded memory), ``commit``, ``interrupted``, ``lock``, ``parts``,
``prepare``, ``audit``, ``writer``, ``retry``.

The guarantees:

- the output is every ``part-*.parquet`` file directly in the output directory: what pyarrow, pandas and
  Ray read, and the one rule resume and the audit follow too. Everything else the project keeps there
  starts with ``_`` (``_lock``, ``_tmp/``, ``_staging-<run>/``, ``_committed-<run>.json``,
  ``_run-<run>.json``), which those readers skip;
- a part file appears whole: on a local disk it is written under ``_tmp/`` and renamed into place; on an
  object store, which has no rename but shows an upload only once it is complete, it is uploaded straight
  under its final, unique name (``schemas.storage.is_object_store``);
- the commit markers ``_committed-<run>.json`` name every part each finished run wrote and every part an
  overwrite replaced. Resume and the audit trust them over a listing: a part a marker names is read by
  name even while a lagging listing does not show it yet, and a part an overwrite replaced is ignored
  even while a lagging listing still shows it (``committed_parts``). The markers are also kept together
  in ``_committed.json``, which is read by name: finding them needs no listing;
- ``resume`` and ``error`` runs commit parts as they go (``pipelines.output.writer``): a part once
  ``output.commit_every_rows`` rows wait for one or the oldest has waited ``output.commit_every_s``
  seconds, so a killed run keeps what it committed and ``resume`` carries on from there. The run that
  takes a killed run's lock over writes it the marker it never wrote (``record_interrupted_run``);
- an ``overwrite`` run commits its parts under ``_staging-<run>/``; only when the run is complete and
  audited does it write its commit marker ``_committed-<run>.json`` (new parts, parts they replace), move
  the new parts in and delete the old ones. A reader sees the old output until then, never none; a swap
  cut short is finished by the next run, which reads the marker;
- an overwrite deletes only parts a commit marker names: the runs of this output wrote them. A part file
  no marker names is never deleted, and an overwrite refuses to start while one is there
  (``check_output_mode``); a run that ends without its marker gets one when it gives its lock back
  (``pipelines.output.lock``);
- row ids are compared in one string form (``id_strings``) on write, resume and audit;
- the audit checks that every id a run answers for has exactly one output row, in bounded memory
  (``pipelines.output.ids``: hash buckets of at most about a million ids).
"""
