INSERT INTO customers (name, email)
SELECT 'customer ' || i, 'customer' || i || '@example.test' FROM generate_series(1, 50) AS i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 50, (i * 13) % 400 FROM generate_series(1, 500) AS i;
