"""The consumers the overhead benchmark runs as their own processes: capwatch and its peers."""
