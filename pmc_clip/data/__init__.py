"""The streaming data pipeline (the read side): webdataset shards (local, s3:// or any
fsspec URL) into per-rank DataLoaders whose batches are dicts of tensors.

    loader = build_train_loader(config.data, caption_tokenizer, rank=rank,
                                world_size=world_size, seed=seed,
                                ranks_per_node=local_world_size)
    loader.set_epoch(epoch)            # or loader.load_state_dict(saved) on resume
    for batch in loader:               # len(loader) batches, identical on every rank
        batch["images"], batch["input_ids"], batch["attention_mask"], batch["keys"]
    loader.meter.snapshot()            # samples/s, data-wait seconds, read/skip counters

Training: sample-exact epochs (`sample_order`). An epoch is a seeded order of every
training sample, fixed by (seed, epoch, canonical node count, span size) and independent
of the world size and worker count; global step t takes the next batch_size x world_size
samples of it and each rank its share. Every sample is seen once per epoch, at any ratio of
readers to shards and with shards of any size; only a remainder smaller than one global
batch waits, a different one every epoch. Every rank yields the same number of batches,
each exactly batch_size samples. Inside every data-loader worker the stream is a list of
small stages (`train_stages`):

    worker_step_runs (this worker's steps: steps w, w + num_workers, ... of the pass)
      -> read_steps (runs of consecutive samples by byte range, read ahead: shard_runs)
      -> decode_step (crop and MLM mask seeded by the sample's place in the order)
      -> fill_step (exactly batch_size: a bad or unreadable sample is replaced by another
         of its batch and counted as samples_substituted) -> batch

The shards need their sample index (`shard_index`, written by make_shards; for shards from
other tools `python tools/index_shards.py SPEC`); a shard without one is a start-up error.
Resume: `state_dict()` is the epoch, the samples consumed and the order's parameters; a
resumed loader continues that epoch at its own world size and worker count and reads
nothing before the resume point.

Evaluation: every val shard once, split by rank then worker, in order (the shard opener
of `shard_reader`, read front to back by `shard_index.tar_members`), the last batch partial
(`eval_stages`):

    shard_urls -> read_shards -> decode_and_transform -> batch

Hostile shards cost bounded time and memory in both: member sizes are checked before
anything is read (training: in the index; evaluation: in each tar header, against the
shard's size), a member claiming more bytes than its shard holds stops that shard at once
(evaluation: a warning, its remaining samples counted as missing), a kept member over
`--max-member-bytes` makes a bad sample without being read, and members the loader drops
are never read into memory. Only plain `.tar` shards are read: a compressed one could
inflate past every limit before its sizes were known.

Security: only image members (jpg/jpeg/png/webp, opened with PIL restricted to those
formats), `.txt` (strict UTF-8) and `.json` are read; anything else in a shard (`.pyd`,
`.pth`, `.npy`, ...) is skipped unread. Shard content is never unpickled.

Modules, in the order a sample meets them:

    sources       shard specs, sizes (sizes.json/manifest.json or the indexes), start-up checks
    epoch_plan    TrainShards, EpochPlan: how a rank's batches are cut from the order
    sample_order  the epoch's order of every training sample (pure numpy)
    shard_reader  opening shards at any fsspec URL: range requests, retried and resumed
    shard_runs    reading runs of consecutive samples by byte range (training)
    shard_cache   the node-local cache of whole shards (--cache-dir)
    eval_stages   reading val shards front to back, members grouped into samples
    train_stages  a worker's steps: runs read, decoded, filled to the batch size
    decode        one sample: image crop, caption, its seeded generator
    counters      a worker's counters and rate-limited warnings
    batches       batch building, shared buffers, pack_batch/unpack_batch (the worker ->
                  trainer format)
    stream        the IterableDataset each worker iterates
    loaders       TrainLoader (state_dict/load_state_dict), EvalLoader, their builders
    val_tables    CSV/JSONL val tables sharded once for evaluation
"""
