
INSERT INTO "kysely_migrations" ("name", "timestamp") VALUES
  ('1744910873969-InitialMigration', '2025-04-20T10:00:00.000Z'),
  ('1744991379464-AddNotificationsTable', '2025-04-20T10:00:01.000Z'),
  ('1746844028242-AddAssetVisibility', '2025-05-12T08:30:00.000Z'),
  ('1749067526350-AddLockedProperties', '2025-06-01T12:00:00.000Z');
INSERT INTO "kysely_migrations_lock" ("id", "is_locked") VALUES ('migration_lock', 0);
INSERT INTO "system_metadata" ("key", "value") VALUES
  ('admin-onboarding', '{"isOnboarded": true}'),
  ('reverse-geocoding-state', '{"lastUpdate": "2025-05-01T00:00:00.000Z", "lastImportFileName": "cities500.txt"}'),
  ('system-flags', '{"mountChecks": {"thumbs": true, "upload": true, "backups": true, "library": true, "profile": true, "encoded-video": true}}'),
  ('version-check-state', '{"checkedAt": "2025-06-01T12:00:00.000Z", "releaseVersion": "v1.135.3"}');
INSERT INTO "version_history" ("id", "createdAt", "version") VALUES
  (md5('version-1')::uuid, '2025-04-20 10:00:00+00', 'v1.132.3'),
  (md5('version-2')::uuid, '2025-06-01 12:00:00+00', 'v1.135.3');
