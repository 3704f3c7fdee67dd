"""Edit: the operations that turn one version of a memory into the next. Each takes a version's
snapshot (``index.snapshot``) and returns the next one, committed: add, remove and rollback
(``edits``), compact and vacuum (``maintenance``), hard and soft pruning (``prune``). Nothing here
imports ``index.memory``: ``VisualMemory`` calls these and switches to what they return."""
