// Run once by mongo:7 on an empty data volume (docker-compose.yml), as its root user: the user the
// pipeline's programs log in as, which may only read and write the pipeline's database.
db.getSiblingDB("admin").createUser({
  user: "app",
  pwd: process.env.MONGO_APP_PASSWORD,
  roles: [{ role: "readWrite", db: process.env.MONGO_DB || "iot" }],
});
