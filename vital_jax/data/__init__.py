"""VITAL training data: records, phantoms, ingestion, questions, teachers, quality gate, dataset build (§3.4, App. A).

Modules are imported explicitly (`from vital_jax.data import records`); nothing heavy is imported here, and no
module of this package imports from vital_jax.models or vital_jax.vital.
"""
