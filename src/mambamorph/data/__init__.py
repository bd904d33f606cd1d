"""Data: label table, preprocessing, the embedded phantom and dataset readers."""
