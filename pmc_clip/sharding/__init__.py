"""The write side: PMC-OA rows (JSONL/CSV) + figures -> webdataset shards and a manifest.

    python tools/make_shards.py --input pmc_oa.jsonl --images images.zip --output shards/

Modules, in the order a run goes through them:
  options.py   ShardOptions: every option, its flag, its checks, its fingerprint
  rows.py      1. the input's records, JSONL or CSV; Skip, a row not written and why
  plan.py      2. row checks, keys, splits, parts, shuffle: what each shard will hold
  workers.py   3. worker processes that read and decode the figures (kept light:
               spawned workers import it; figures themselves: pmc_clip/sharding/figures.py)
  writer.py    4. samples packed into tar shards, each published with its index
  progress.py  resume: which recorded shards a rerun keeps, and discarding the rest
  format.py    the output's format, read by both sides: names, brace patterns,
               ShardRecord, Manifest (manifest.json), sizes.json, a part's summary
  store.py     calls on --output, retried on object stores
  lock.py      one run per --output
  run.py       make_shards: the stages, in order
  merge.py     make_shards --merge: the manifest of an output written in parts
  cli.py       the command line and its exit codes
  inspect.py   tools/inspect_shards.py: verify shards against their manifest
  index.py     tools/index_shards.py: write missing sample indexes (.idx)

  identities.py  what tells one version of a figure or shard from another (resume, merge)
  figures.py   one figure: what is read and refused, kept or converted (in the workers)

Nothing is imported here: import each module by name. make_shards and its workers import
no torch; inspect.py imports the loader (pmc_clip.data, and torch with it).
"""
