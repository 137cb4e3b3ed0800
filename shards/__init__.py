"""The offline stage: raw videos -> validated WebDataset shards, DALI index files and a parquet manifest."""
