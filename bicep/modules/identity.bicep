// User-assigned managed identities.
//
// `app` is what rtpd authenticates as (Blob, Service Bus, Redis, Key Vault).
// `scaler` is used only by the processor's KEDA scale rule: reading a queue's
// message count needs the Manage right (Azure Service Bus Data Owner), which the
// app identity must not have. Both are attached to the processor app; rtpd picks
// `app` through RTPD_AZURE_CLIENT_ID.

param location string
param appIdentityName string
param scalerIdentityName string

resource app 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: appIdentityName
  location: location
}

resource scaler 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: scalerIdentityName
  location: location
}

output appIdentityId string = app.id
output appClientId string = app.properties.clientId
output appPrincipalId string = app.properties.principalId
output scalerIdentityId string = scaler.id
output scalerPrincipalId string = scaler.properties.principalId
