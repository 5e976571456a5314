"""coupon: first-come-first-served coupon issuance."""
