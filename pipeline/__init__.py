"""Data only: everything that reads or writes frames, pairs and shards. Nothing here knows the model.

The stages, in the order data flows (DESIGN.md, "Data flow"):

    record.py         real ALE Breakout play -> bulk_videos/<episode>/<N>.png + meta.jsonl
      actions.py      Breakout's action ids and names (meta.jsonl's `action`)
    pack.py           validate, pair (t, t+1) inside episodes, split by episode -> shards/pairs/
      png.py          PNG structure checks (shared by the packer and the loader), PIL decoding
      shards.py       reproducible atomic tar + .idx writer, index reader, manifests and the checks
                      of what they promise (sample counts, lengths, sha256)
      manifest_schema.py  what a manifest must hold, checked on every read
      shard_set.py    a shard set published with one rename (a link to a versioned folder)
    loader.py         build_loader: pair shards -> batches of frames on the device (DALI or PyTorch)
      pair_index.py   which frames make which pair, across a split's shards
      frame_decoders.py  DALI and PIL decoders behind one interface
      frames.py       the one preprocessing function both decoders feed (gray, normalise)
    latent.py         the latent shard format: samples (codes uint8, or uint16 past 256 codes), completion
                      records, manifest, .tar.zst copies (model/extraction.py fills it)
    stream.py         latent_dataset: shards/latent/ (.tar or .tar.zst) -> samples for downstream training

Imports run one way: common <- pipeline <- model <- evaluation <- training, control <- scripts; the
user-error channel and the device rule live in common/.
"""
