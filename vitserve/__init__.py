"""The `vitserve` command (a dispatcher over each stage's CLI), the end-to-end demo and the import-graph check."""
