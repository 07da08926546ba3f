-- rollback: no-transaction
DROP INDEX CONCURRENTLY orders_by_customer;
