
INSERT INTO "album" ("id", "ownerId", "albumName", "description", "albumThumbnailAssetId", "order",
                     "createdAt", "updatedAt") VALUES
  (md5('album-1')::uuid, '@ADMIN@', 'Été 2024 ☀️', 'Vacances à la mer — 海',
   (SELECT id FROM "asset" WHERE "deviceAssetId" = 'device-asset-1'), 'desc',
   '2024-07-01 09:00:00+00', '2024-08-01 09:00:00+00'),
  (md5('album-2')::uuid, '@ZOE@', 'Family', '', NULL, 'asc',
   '2024-02-01 09:00:00+00', '2024-02-01 09:00:00+00'),
  (md5('album-3')::uuid, '@KENJI@', '東京 2023', '桜 🌸',
   (SELECT id FROM "asset" WHERE "deviceAssetId" = 'device-asset-5'), 'desc',
   '2023-04-01 09:00:00+00', '2023-04-02 09:00:00+00'),
  (md5('album-4')::uuid, '@ADMIN@', 'Empty album', '', NULL, 'desc',
   '2025-01-01 09:00:00+00', '2025-01-01 09:00:00+00');
INSERT INTO "album_asset" ("albumId", "assetId", "createdAt")
SELECT md5('album-' || k)::uuid, a.id, a."createdAt"
FROM (SELECT id, "createdAt", substr("deviceAssetId", 14)::bigint AS n FROM "asset") AS a
CROSS JOIN generate_series(1, 3) AS k
WHERE a.n % (k + 6) = 0;
