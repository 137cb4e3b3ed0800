"""The built-in sample: synthetic labelled motion videos (`render`: the scenes; `generate`: the dataset)."""
