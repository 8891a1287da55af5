"""Model families (pure models, no VITAL knowledge): qwen3, qwen3_vl, siglip, sam."""
