"""Deterministic clinical facts: the ICD-10-CM code table (icd10), reference ranges, lab rules."""
