"""Research harnesses (the learning proof and its recipe search): they reuse the product, never copy it."""
