"""Importers of released checkpoints: HazyResearch BASED (`based.import_based`) and LoLCATs
(`lolcats.import_lolcats`)."""
