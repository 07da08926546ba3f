ALTER TABLE customers ADD COLUMN name text;
UPDATE customers SET name = concat_ws(' ', first_name, last_name);
ALTER TABLE customers ALTER COLUMN name SET NOT NULL;
ALTER TABLE customers DROP COLUMN first_name, DROP COLUMN last_name;
