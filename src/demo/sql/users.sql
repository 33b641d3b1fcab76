
INSERT INTO "user" ("id", "email", "name", "isAdmin", "storageLabel", "profileImagePath",
                    "quotaSizeInBytes", "quotaUsageInBytes", "createdAt", "updatedAt") VALUES
  ('@ADMIN@', 'admin@example.com', 'Ådmin Zoë-Łukasz', true, 'admin',
   '/data/profile/@ADMIN@/avatar.jpg', NULL, 123456789, '2023-01-02 10:00:00+00', '2025-06-01 12:00:00+00'),
  ('@ZOE@', 'zoe@example.com', 'Zoë Müller', false, 'zoe', '', 107374182400, 5368709120,
   '2023-02-03 11:00:00+00', '2025-06-01 12:00:00+00'),
  ('@KENJI@', 'kenji@example.com', '山田 健二', false, NULL, '', NULL, 0,
   '2023-03-04 12:00:00+00', '2025-06-01 12:00:00+00');
