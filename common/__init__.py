"""Machinery every stage uses: typed configs and the command line (`config`, `cli`), atomic file writes, hashes
and fsspec helpers (`files`), the device choice (`device`) and the error types more than one stage raises
(`errors`). Nothing here knows about video, models or training."""
