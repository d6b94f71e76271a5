"""What users run: the ``dbmef`` CLI, the digits demo and its data, and the benchmark."""
