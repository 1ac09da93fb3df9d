"""Model families as data: ``families`` holds one record per family (tensor layout, vocabulary tensors,
tied heads, the transformers class, the symmetry spec, the structure keys); ``symmetry`` holds the spec
types and one spec file per family. Everything above reads a family from its record, never by name."""
