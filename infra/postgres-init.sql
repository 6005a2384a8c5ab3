-- One PostgreSQL for both servers: a database each.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
