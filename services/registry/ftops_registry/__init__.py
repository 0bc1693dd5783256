"""The registry service: base models, adapter versions, lineage, aliases, artifacts and
release history. The source of truth the other services ask; nothing else keeps state
about versions."""
